from tun2socks.cli import main

raise SystemExit(main())
