from artscale.cli import main

main()
