"""stairs-bench: every benchmark of the engine, one subcommand each (needs [bench]).

cli: the command (`stairs-bench SUBCOMMAND`); one module per subcommand (run, batch, load,
exact, memory, coldstart, profile, gpu/, export_bench); common: what they all share; workload:
the flags and options run and batch share; core: the interleaved benchmark and strategy specs;
peers: HF, optimum and CTranslate2; quiet: whether the machine was quiet; report: run's and
batch's results.md and plots.
"""
