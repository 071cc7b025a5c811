"""The parts of `rtm-mapping bench`, one module each, run and reported in the order of PARTS.

A part module defines:

    TITLE                                   what it measures, in a few words (progress lines).
    TARGETS                                 its limits (targets.Limit), by name.
    measure(run: Settings) -> dict          its results, JSON-able: the part's entry in the bench JSON.
    targets(result, run) -> list of dict    its targets judged on those results (Limit.judge).
    markdown(result, meta) -> list of str   its table, from the saved results alone (the GPU report
                                            re-renders bench JSONs written earlier).
    NEEDS_CHECKOUT = True                   optional: the part builds official networks; skipped without
                                            a StyleGAN2-ADA checkout.

A new part is a new module here and its entry in PARTS.
"""

from rtm_mapping.bench.parts import dispatch, generator, mapper, memory

PARTS = {
    'mapper':       mapper,
    'dispatch':     dispatch,
    'memory':       memory,
    'generator':    generator,
}
