"""Run one extract that SIGKILLs itself at its N-th write event (a helper of test_kill_points).

Usage: python tests/kill_child.py JSON with ``{"kill_at": N, "data": ..., "out": ...,
"backbones": [...], "options": {...}}``. Every call that writes (a part, feature rows, the commit
of the file, removing the parts, the latest pointer) counts as two events, before and after it; the
process kills itself when the count reaches ``kill_at``.
"""

import json
import os
import shutil
import signal
import sys

from featurepipe import chunks, planning, store
from featurepipe import extract as ex

settings = json.loads(sys.argv[1])
count = 0


def event():
    global count
    count += 1
    if count == settings["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)


def hooked(func):
    def call(*args, **kwargs):
        event()
        result = func(*args, **kwargs)
        event()
        return result
    return call


chunks.save_part = hooked(chunks.save_part)
planning.write_json_atomic = hooked(planning.write_json_atomic)  # the parts folder's settings
ex.write_json_atomic = hooked(ex.write_json_atomic)  # the latest-run record
store.FeatureFileWriter.write_rows = hooked(store.FeatureFileWriter.write_rows)
store.FeatureFileWriter.commit = hooked(store.FeatureFileWriter.commit)
shutil.rmtree = hooked(shutil.rmtree)
ex.extract(settings["data"], settings["backbones"], out=settings["out"], **settings["options"])
