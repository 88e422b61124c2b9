"""Why does RegMean trail task arithmetic on some zoos? A small diagnosis.

    .venv/bin/python benchmarks/data_aware_diagnose.py --zoo mlp --recipe joint --seed 0

For one built zoo it prints, per merge: test accuracy (each task's head) and, per task, the
relative feature error ||f_merged(X_t) - f_t(X_t)||^2 / ||f_t(X_t) - f_0(X_t)||^2 on that task's
test inputs (f_t: task t's fine-tuned encoder, f_0: the pretrained one). RegMean minimises a
per-layer version of this error, so it should have the lowest; if its accuracy is nonetheless
lower, the L2 feature error is not what the heads need. Rows: simple average, task arithmetic
at a few lambdas, RegMean at several alpha, and RegMean's merged task vector scaled by s
(`scaling`, mergelab's extension) to compare at equal amplification with task arithmetic
(lambda x number of tasks).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch.func import functional_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="mlp")
    parser.add_argument("--recipe", default="joint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")

    import mergelab
    from mergelab.eval.harness import evaluate_model
    from mergelab.stats.batches import call_module, split_batch
    from mergelab.stats.fisher import BoundForward
    from mergelab_bench.bench import GridPoint, merge_zoo
    from mergelab_bench.data_aware_zoos import ZooData
    from mergelab_bench.zoo.registry import get_zoo

    built = get_zoo(args.zoo).build(recipe=args.recipe, seed=args.seed, progress=False)
    adapter = ZooData(built)
    module = adapter.module()
    tasks = list(built.tasks)
    train = {t: adapter.task_data(t, "train", args.examples) for t in tasks}
    test = {t: adapter.task_data(t, "test", args.examples) for t in tasks}
    finetuned = {t: built.finetuned[t] for t in tasks}

    @torch.no_grad()
    def features(state, task):
        bound = BoundForward(module, test[task].forward or call_module)
        params = {f"inner.{k}": v for k, v in state.items()}
        return torch.cat([functional_call(bound, params, (split_batch(b)[0],)) for b in test[task].batches])

    reference = {t: (features(finetuned[t], t), features(built.pretrained, t)) for t in tasks}

    def report(name, state):
        state = {**built.pretrained, **state}
        acc = evaluate_model(built.evaluator, state, built.heads, tasks=tasks)
        errors = []
        for t in tasks:
            merged = features(state, t)
            own, base = reference[t]
            errors.append(float((merged - own).square().sum() / (own - base).square().sum()))
        print(f"{name:26s} accuracy {100 * sum(acc.values()) / len(tasks):5.1f}   relative feature error "
              + " ".join(f"{e:.2f}" for e in errors), flush=True)

    print(f"{args.zoo} zoo, recipe {args.recipe}, seed {args.seed}; tasks {', '.join(tasks)}")
    report("simple average", merge_zoo(built, "linear", GridPoint()))
    for lam in (0.3, 0.6):
        report(f"task arithmetic {lam}", merge_zoo(built, "task_arithmetic", GridPoint({"lambda": lam})))
    for alpha in (0.0, 0.9, 1.0):
        r = mergelab.data_merge("regmean", module, finetuned, train, alpha=alpha)
        report(f"regmean alpha {alpha}", r.state_dict)
    for scaling in (1.5, 2.0, 2.5):
        r = mergelab.data_merge("regmean", module, finetuned, train, alpha=0.9, scaling=scaling,
                                base_state_dict=built.pretrained)
        report(f"regmean x{scaling}", r.state_dict)


if __name__ == "__main__":
    main()
