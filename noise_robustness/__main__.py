from noise_robustness.cli import cli_main

cli_main()
