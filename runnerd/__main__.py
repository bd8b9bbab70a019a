from runnerd.server import main

main()
