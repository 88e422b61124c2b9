"""Evaluation: tasks, evaluators and multi-task result tables."""
