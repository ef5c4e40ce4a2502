"""Lesson tooling: sources -> executed notebooks with nbgrader metadata, handouts, grading.

The source of every lesson is `lessons/NN_slug.py` in jupytext's "percent" format (markup.py
describes the cell headers and regions). From the repository root:

    python -m minimoe.lessons build   [--lessons DIR] [--no-execute] [--force]
        write NN_slug.npz (reference values) and the executed NN_slug.ipynb of every lesson
    python -m minimoe.lessons check   [--lessons DIR]
        exit 1 if a notebook's cells differ from its source or an .npz is out of date (CI)
    python -m minimoe.lessons student OUTDIR [--lessons DIR]
        handouts: solution regions stubbed, hidden tests removed, no outputs, .npz beside them
        (from ./lessons, else from the lesson sources installed with the package)
    python -m minimoe.lessons copy DIR [--force]
        the lesson notebooks and .npz files shipped with the installed package, into DIR
    python -m minimoe.lessons grade SUBMISSION.ipynb [--json] [--lessons DIR]
        execute a submission and report each graded check: pass/fail, points, first message line
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minimoe.lessons.build import (
    build,
    copy_lessons,
    expected_notebook,
    lesson_files,
    notebook_dirs,
    references,
    stale,
    write_student,
)
from minimoe.lessons.grade import format_report, grade
from minimoe.lessons.markup import (
    BEGIN,
    END,
    HIDDEN_BEGIN,
    HIDDEN_END,
    LESSON_RE,
    Cell,
    LessonError,
    make_student,
    parse_cells,
    solution_regions,
    split_cells,
)
from minimoe.lessons.notebook import SETUP_SOURCE, handout, notebook_text, py_to_notebook, skeleton

__all__ = [
    "BEGIN", "END", "HIDDEN_BEGIN", "HIDDEN_END", "LESSON_RE", "SETUP_SOURCE", "Cell", "LessonError",
    "build", "copy_lessons", "expected_notebook", "format_report", "grade", "handout", "lesson_files", "main",
    "make_student", "notebook_dirs", "notebook_text", "parse_cells", "py_to_notebook", "references",
    "skeleton", "solution_regions", "split_cells", "stale", "write_student",
]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minimoe.lessons", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser(
        "build", help="write every lesson's .npz and executed .ipynb from its .py source"
    )
    p_build.add_argument("--no-execute", action="store_true", help="write notebooks without running them")
    p_build.add_argument("--force", action="store_true", help="rebuild notebooks that are up to date")
    p_check = sub.add_parser("check", help="exit 1 if any notebook or .npz is out of date with its source")
    p_student = sub.add_parser("student", help="write handouts (solutions removed) into OUTDIR")
    p_student.add_argument("outdir", help="directory for the handout .ipynb, .py and .npz files")
    p_copy = sub.add_parser("copy", help="copy the lesson notebooks and their .npz files into DIR")
    p_copy.add_argument("outdir", metavar="DIR", help="where to put the notebooks")
    p_copy.add_argument("--force", action="store_true", help="overwrite files that differ")
    p_grade = sub.add_parser("grade", help="execute a submitted notebook and score its checks")
    p_grade.add_argument("submission", help="the learner's .ipynb")
    p_grade.add_argument("--json", action="store_true", help="print the report as JSON")
    p_grade.add_argument("--timeout", type=int, default=300, help="seconds per cell (default: 300)")
    for p in (p_build, p_check):
        p.add_argument("--lessons", default="lessons", help="the lessons directory (default: lessons)")
    p_student.add_argument(
        "--lessons", default=None, help="the lesson sources (default: ./lessons, else the installed ones)"
    )
    for p in (p_copy, p_grade):
        p.add_argument(
            "--lessons", default=None, help="take the lessons from DIR (default: the installed ones)"
        )
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            changed = build(args.lessons, execute=not args.no_execute, force=args.force)
            for path in changed:
                print(f"wrote {path}")
            print(f"{len(lesson_files(args.lessons))} lesson(s), {len(changed)} file(s) changed")
        elif args.command == "student":
            dirs = ("lessons", *notebook_dirs())
            sources = args.lessons or next(
                (d for d in dirs if any(Path(d).glob("[0-9][0-9]_*.py"))), "lessons"
            )
            written = write_student(args.outdir, sources)
            print(f"wrote {len(lesson_files(sources))} handout(s) ({len(written)} files) to {args.outdir}")
        elif args.command == "copy":
            written = copy_lessons(args.outdir, args.lessons, force=args.force)
            print(f"copied {sum(p.suffix == '.ipynb' for p in written)} lesson notebook(s) to {args.outdir}")
        elif args.command == "grade":
            report = grade(args.submission, lessons_dir=args.lessons, timeout=args.timeout)
            print(json.dumps(report, indent=1) if args.json else format_report(report))
        else:
            problems = stale(args.lessons)
            for line in problems:
                print(line)
            if problems:
                print("run `python -m minimoe.lessons build` and commit the notebooks and .npz files")
                return 1
            print(f"{len(lesson_files(args.lessons))} lesson notebook(s) up to date")
    except LessonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0
