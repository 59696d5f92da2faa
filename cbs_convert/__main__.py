from cbs_convert.cli.main import entry

entry()
