from fusedtx.cli import main

main()
