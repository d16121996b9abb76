from aiflow_cli.cli import main

main()
