"""``python -m noise_robustness {fit,validate,test,predict,sweep,certify} ...``"""

from noise_robustness.memory import tune_allocator

tune_allocator()  # before torch is imported: torch decides on huge pages at its first allocation

from noise_robustness.cli import cli_main  # noqa: E402

cli_main()
