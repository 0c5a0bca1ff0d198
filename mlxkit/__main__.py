from mlxkit.cli import main

main()
