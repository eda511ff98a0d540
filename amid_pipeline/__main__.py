from amid_pipeline.cli import main

main()
