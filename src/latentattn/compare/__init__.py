"""``latentattn compare``: MHA, MQA, GQA, MLA and MLA+DSA trained alike and measured alike.

One idea per module: ``variants`` (the parameter-matched models), ``sweep`` (``--sweep``
values), ``measure`` (KV parameters and bytes, decode speed, DSA recall), ``stats`` (mean,
spread, the paired test against MHA and its verdict), ``report`` (the results' data model),
``run`` (train and measure every variant and seed), ``store`` (finished runs on disk, for
resuming), ``probe`` (the time estimate), ``table`` and ``plots`` (the report).
The subcommand is :mod:`latentattn.cli.compare`. Nothing here is imported by the rest of
latentattn but the CLI.
"""
