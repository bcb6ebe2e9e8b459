"""Evidence: the benchmarks, studies and model catalogue behind reports/.

`python -m fewbit_fx bench` regenerates reports/ from these modules. The runtime
(optimize, report, the ops, the backend) never imports this package; the CLI uses the
model catalogue (`models`) for `report <model>` and `demo`.
"""
