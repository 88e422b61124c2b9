"""`mergelab lora fold | merge | extract`: a thin adapter over mergelab.lora.ops."""

from __future__ import annotations

from pathlib import Path

import typer


def _parse_params(values: list[str]) -> dict[str, float | int | bool]:
    params: dict[str, float | int | bool] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected NAME=VALUE; got {item!r}", param_hint="--param")
        lowered = raw.strip().lower()
        if lowered in ("true", "false"):
            params[key] = lowered == "true"
            continue
        try:
            number = float(raw)
        except ValueError:
            raise typer.BadParameter(f"{key}: not a number: {raw!r}", param_hint="--param") from None
        params[key] = int(number) if number.is_integer() and "." not in raw else number
    return params


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected numbers separated by commas; got {text!r}",
                                 param_hint="--weights") from None


def register(app: typer.Typer) -> None:
    lora = typer.Typer(
        name="lora", help="LoRA adapters: fold into a base, merge several, extract from a fine-tune.",
        no_args_is_help=True,
    )
    app.add_typer(lora, name="lora")

    @lora.command("fold")
    def fold(
        base: Path = typer.Argument(..., help="Base checkpoint folder or file."),
        adapter: Path = typer.Argument(..., help="PEFT adapter folder (adapter_config.json + weights)."),
        out_dir: Path = typer.Argument(..., help="Output checkpoint folder (created atomically)."),
        out_shard_size: str = typer.Option("5GB", help="Maximum shard size: bytes or e.g. 2GB."),
        overwrite: bool = typer.Option(False, help="Replace an existing output folder atomically."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Fold ADAPTER into BASE (W + scale * B @ A), tensor by tensor, into OUT_DIR."""
        from mergelab.cliutil import console, fail
        from mergelab.errors import MergeLabError
        from mergelab.lora.ops import fold_adapter

        try:
            report = fold_adapter(base, adapter, out_dir, out_shard_size=out_shard_size,
                                  overwrite=overwrite, progress=progress)
        except MergeLabError as exc:
            fail(exc)
            return
        console.print(
            f"folded {report.folded} tensor(s) (and replaced {report.replaced}) of "
            f"{report.tensors} into {out_dir} in {report.seconds:.2f} s "
            f"({report.tensors_per_second:.1f} tensors/s)"
        )

    @lora.command("merge")
    def merge(
        adapters: list[Path] = typer.Argument(..., help="PEFT adapter folders of one base."),
        out_dir: Path = typer.Option(..., "--out", "-o", help="Output adapter folder (created atomically)."),
        weights: str | None = typer.Option(None, help="One weight per adapter, e.g. 0.7,0.3 (default 1 each)."),
        combination: str = typer.Option(
            "delta", help="cat (exact concatenation), delta (merge B@A deltas with --method, then SVD), "
            "knots (KnOTS shared basis, then --method), factors (PEFT's A/B-separate combination).",
        ),
        method: str = typer.Option("task_arithmetic", help="Data-free registry method (see `mergelab methods`)."),
        param: list[str] = typer.Option([], "--param", help="Method parameter NAME=VALUE (repeatable), e.g. density=0.5."),
        rank: int | None = typer.Option(None, help="Rank of the result for delta/knots (default: largest input rank)."),
        svd: str = typer.Option("exact", help="exact or randomized SVD for the re-factorisation."),
        seed: int = typer.Option(0, help="Seed of randomised methods and randomised SVD."),
        dtype: str | None = typer.Option(None, help="Dtype of the written factors (default: the inputs')."),
        overwrite: bool = typer.Option(False, help="Replace an existing output folder atomically."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Merge ADAPTERS into one adapter (see docs/lora.md for the semantics vs PEFT)."""
        from mergelab.cliutil import console, fail
        from mergelab.errors import MergeLabError
        from mergelab.lora.ops import merge_adapters

        try:
            report = merge_adapters(
                adapters, out_dir, weights=_parse_weights(weights), combination=combination,
                method=method, params=_parse_params(param), rank=rank, svd=svd, seed=seed,
                dtype=dtype, overwrite=overwrite, progress=progress,
            )
        except MergeLabError as exc:
            fail(exc)
            return
        worst = max((m.relative_error for m in report.modules), default=0.0)
        console.print(
            f"merged {len(adapters)} adapter(s) with `{report.method}` into {out_dir}: "
            f"{len(report.modules)} module(s), worst relative re-factorisation error {worst:.2e}, "
            f"{report.seconds:.2f} s"
        )

    @lora.command("extract")
    def extract(
        base: Path = typer.Argument(..., help="Base checkpoint."),
        finetuned: Path = typer.Argument(..., help="Fine-tuned checkpoint of the same architecture."),
        out_dir: Path = typer.Argument(..., help="Output adapter folder (created atomically)."),
        rank: int | None = typer.Option(None, help="Rank of every module (the cap, with --energy)."),
        energy: float | None = typer.Option(
            None, help="Per-module rank keeping this fraction of the delta's squared norm, in (0, 1]."
        ),
        embeddings: bool = typer.Option(False, help="Extract LoRA for embeddings too (else saved whole)."),
        svd: str = typer.Option("exact", help="exact or randomized (fixed --rank only)."),
        seed: int = typer.Option(0, help="Seed of the randomised SVD."),
        dtype: str | None = typer.Option(None, help="Dtype of the factors (default: the fine-tune's)."),
        overwrite: bool = typer.Option(False, help="Replace an existing output folder atomically."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Extract a PEFT LoRA adapter from FINETUNED - BASE by per-module SVD."""
        from mergelab.cliutil import console, fail
        from mergelab.errors import MergeLabError
        from mergelab.lora.ops import REPORT_FILE, extract_adapter

        try:
            report = extract_adapter(
                base, finetuned, out_dir, rank=rank, energy=energy, embeddings=embeddings,
                svd=svd, seed=seed, dtype=dtype, overwrite=overwrite, progress=progress,
            )
        except MergeLabError as exc:
            fail(exc)
            return
        errors = [m["relative_error"] for m in report.modules.values()]
        ranks = [m["rank"] for m in report.modules.values()]
        console.print(
            f"extracted {len(report.modules)} module(s) (ranks {min(ranks, default=0)}-"
            f"{max(ranks, default=0)}, worst relative error {max(errors, default=0.0):.2e}) and "
            f"{len(report.saved)} saved tensor(s) into {out_dir} in {report.seconds:.2f} s; "
            f"per-module errors in {out_dir / REPORT_FILE}"
        )
        for name in report.skipped:
            console.print(f"[yellow]note:[/] `{name}` changed but a LoRA module cannot carry it")
