"""Benchmark zoos: a pretrained encoder fine-tuned on several real tasks, built reproducibly."""
