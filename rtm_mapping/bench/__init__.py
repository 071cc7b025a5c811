"""`rtm-mapping bench`: what RTM costs against the MLP mapper of StyleGAN2-ADA, measured side by side.

    command.py      the command: settings, checkout, the parts asked for, the JSON and the report.
    settings.py     the settings every part receives, and their defaults (full run, --quick).
    parts/          one module per part (mapper, dispatch, memory, generator) and the table of parts.
    mappers.py      the mappers the parts compare, built one way.
    probes.py       how a quantity is measured: paired time, autograd memory, dispatched ops, FLOPs.
    targets.py      a limit, its unit, and a value judged against it.
    report.py       the markdown of a bench JSON.
    gpu_report.py   scripts/gpu_bench.sh's report: bench JSONs and train.py's speed, in one table.
"""
