"""Where weights come from: timm names, ``hf-hub:`` ids, ``local-dir:`` folders and weight files,
for teachers (`load_teacher`) and exported students (`load_student`) alike."""

from .exported_student import load_student
from .teacher import (
    TeacherLoadError,
    TeacherNotAvailable,
    TeacherRecord,
    UnsafeCheckpointError,
    fetch_teacher,
    load_teacher,
)

__all__ = [
    "TeacherLoadError",
    "TeacherNotAvailable",
    "TeacherRecord",
    "UnsafeCheckpointError",
    "fetch_teacher",
    "load_student",
    "load_teacher",
]
