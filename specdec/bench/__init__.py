"""``specdec-local bench``: specdec's methods against transformers' decoding, side by side.

- :mod:`specdec.bench.harness`: what to run (:class:`~specdec.bench.harness.BenchConfig`, the prompt
  set), the runners, and the timed, interleaved runs that give one row per prompt and runner.
- :mod:`specdec.bench.report`: the rows, their geometric means, and the Markdown table, JSON and plot.
"""
