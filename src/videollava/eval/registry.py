"""Every task of `videollava eval`, by name."""

from __future__ import annotations

from collections.abc import Callable

from videollava.errors import VideoLlavaError
from videollava.eval.image_tasks import IMAGE_TASKS
from videollava.eval.items import Task
from videollava.eval.judged_tasks import JUDGED_IMAGE_TASKS
from videollava.eval.video_tasks import VIDEO_QA_TASKS, VideoChatGPTTask
from videollava.shapesworld.evaluate import ShapesWorldTask

_FACTORIES: dict[str, Callable[[], Task]] = {"shapesworld": ShapesWorldTask}
for _task in VIDEO_QA_TASKS:
    _FACTORIES[_task.name] = lambda t=_task: t
_FACTORIES["videochatgpt-gen"] = VideoChatGPTTask
for _cls in (*IMAGE_TASKS, *JUDGED_IMAGE_TASKS):
    _FACTORIES[_cls.name] = _cls

TASK_NAMES = tuple(_FACTORIES)


def get_task(name: str) -> Task:
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise VideoLlavaError(f"unknown task {name!r}; the tasks are {', '.join(TASK_NAMES)}") from None


def describe() -> str:
    """`videollava eval --list`: each task, what it measures, and the files it reads from --data-dir."""
    blocks = []
    for name in TASK_NAMES:
        task = get_task(name)
        judged = f" [judge: {task.judge}]" if task.judge else ""
        lines = [f"{name}{judged}", f"    {task.summary}"]
        for f in task.files:
            optional = " (optional)" if f.optional else ""
            lines.append(f"    D/{f.path.replace('|', ' or D/')}{optional}: {f.what}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
