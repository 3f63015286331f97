"""Scale-out on one host: ``cnn-serve --workers N`` runs N whole servers (``worker``) on shared
ports under one ``supervisor``, with one ``/metrics`` over all of them (``metrics``)."""
