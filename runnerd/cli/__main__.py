from runnerd.cli import main

main()
