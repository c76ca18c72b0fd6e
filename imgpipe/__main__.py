from imgpipe.face.cli import main

main()
