"""Where one BoTorch proposal's time goes (autopeft.sampler on bench/search_overhead.py's synthetic history at 100
trials, 20 dims, q=1): the times of 4 consecutive proposals, then cProfile's top entries for the last one
(qLogNEHVI construction = hypervolume.py `_set_cell_bounds`, `optimize_acqf`, `discrete`, `_fit`). A diagnostic,
not a benchmark: bench/search_overhead.py's JSON is the measurement of record.

    python bench/profile/proposal.py                            # the sampler's budget
    python bench/profile/proposal.py MC_SAMPLES=32 RAW_SAMPLES=128   # another budget (autopeft.sampler constants)
"""
import cProfile
import io
import pstats
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo

import optuna
from search_overhead import fake, history

from autopeft import sampler

warnings.filterwarnings("ignore")
optuna.logging.set_verbosity(optuna.logging.WARNING)
for pair in sys.argv[1:]:
    name, _, value = pair.partition("=")
    if not hasattr(sampler, name) or not value.isdigit():
        print(f"usage: proposal.py [NAME=N ...] with NAME an autopeft.sampler constant, got {pair!r}", file=sys.stderr)
        sys.exit(2)
    setattr(sampler, name, int(value))

study, space, dists, rng = history(100, 6, 0)
times, profile = [], cProfile.Profile()
for i in range(4):
    started = time.perf_counter()
    if i == 3:
        profile.enable()
    trial = study.ask(dists)
    if i == 3:
        profile.disable()
    times.append(round(time.perf_counter() - started, 2))
    values, con = fake(space.decode(trial.params, 6), rng)
    trial.set_user_attr("constraints", [con])
    study.tell(trial, values)
print("proposal seconds:", times)
out = io.StringIO()
pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(40)
print(out.getvalue())
