"""Where weights come from: timm names, ``hf-hub:`` ids, ``local-dir:`` folders and weight files,
for teachers (`load_teacher`) and exported students (`load_student`) alike."""

from .exported_student import load_student as load_student
from .teacher import (
    TeacherLoadError as TeacherLoadError,
    TeacherNotAvailable as TeacherNotAvailable,
    TeacherRecord as TeacherRecord,
    UnsafeCheckpointError as UnsafeCheckpointError,
    fetch_teacher as fetch_teacher,
    load_teacher as load_teacher,
)
