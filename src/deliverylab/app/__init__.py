"""The lab as processes: the HTTP API, the ``deliverylab`` command and its reports."""
