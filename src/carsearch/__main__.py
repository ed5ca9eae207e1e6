from carsearch.cli import main

main()
