"""The study: the paper's grid (base x size x method x number of experts x seed) as one resumable run.

    from mergescale import study
    plan = study.plan("configs/study/tiny.yaml")     # validate; plan.describe() prints counts, bytes and time
    out = study.run("configs/study/tiny.yaml")       # train -> references -> cells -> ledger -> report
    study.status(out["run_dir"])                      # done / running / failed / pending cells

Modules: config (the schema), grid (the seed rule, cells), plan (validation and cost), cells (a cell's key,
merge and evaluation), runner (the flow, top to bottom), ledger (the run directory and its Parquet ledger).
"""


def run(config, **kwargs):
    """Run (or resume, or grow) a study; see mergescale.study.runner.run."""
    from mergescale.study.runner import run as _run

    return _run(config, **kwargs)


def plan(config, **overrides):
    """Validate a study config and return its StudyPlan (plan.describe() is what `study plan` prints)."""
    from mergescale.study.plan import make_plan

    # the first import of the submodule mergescale.study.plan rebinds this package's name `plan` to the module;
    # put the function back so a second call works
    globals()["plan"] = _plan_function
    return make_plan(config, **overrides)


_plan_function = plan


def status(run_dir):
    from mergescale.study.ledger import status as _status

    return _status(run_dir)
