"""Real labelled data offline: adapters that build task data files from corpora shipped inside packages."""
