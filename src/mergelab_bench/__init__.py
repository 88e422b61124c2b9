"""The benchmark harness above the mergelab library: zoo builders, the bench runner, the studies
(multimodal recipe, metric study, data-aware zoo merges) and the demo.

The library never imports this package (an import-linter contract in `make test` checks it); its
commands join the `mergelab` CLI through the `mergelab.commands` entry point group.
"""
