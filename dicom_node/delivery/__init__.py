"""Delivery: send recorded results to their destinations (``sender``) over a C-STORE client (``scu``)."""
