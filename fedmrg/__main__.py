from fedmrg.cli import main

main()
