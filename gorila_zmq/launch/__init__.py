"""Launchers: the program description (config -> role specs, the layout recorded in the run), the
supervisor (dev mode, one per host), the ssh cluster launcher and `gorila-zmq status`."""
