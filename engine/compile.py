"""--compile: which torch.compile backend compiles the student and the teacher."""
import os


def compile_backend():
    """The torch.compile backend of --compile: inductor, unless $SEGKD_COMPILE_BACKEND names another (the
    tests use aot_eager: the same tracing and graph-break checks without inductor's minutes of codegen)."""
    return os.environ.get("SEGKD_COMPILE_BACKEND", "inductor")
