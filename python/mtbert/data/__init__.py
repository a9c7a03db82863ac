"""Data: the task registry (tasks.py) and how tasks are scored (metrics.py), the file readers
(readers.py), tokenization (tokenizer.py, with the pure-Python oracle _wordpiece_py.py), and
encoded splits, batches and sampling (batches.py)."""

from .readers import Example, Split, load_split, read_split, resolve_data_dir
from .tasks import BUILTIN_TASKS, Task, define_task, get_task, known_tasks, register
from .tokenizer import BatchEncoding, WordPieceTokenizer

__all__ = ["Example", "Split", "load_split", "read_split", "resolve_data_dir", "BUILTIN_TASKS", "Task",
           "define_task", "get_task", "known_tasks", "register", "BatchEncoding", "WordPieceTokenizer"]
