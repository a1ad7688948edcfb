"""Receive: accept associations, take C-STORE instances, file them durably and index them.

``listener`` starts it; ``server`` runs associations over ``upper_layer`` (PDU and DIMSE codec), negotiated
by pynetdicom; ``access`` decides who gets in and within what limits; ``incoming`` checks an instance
(``dataset_check`` walks it) and places it; ``group_commit`` shares flushes and index transactions;
``listener_pool``/``listener_process``/``shared_counts`` run several listener processes on one port.
"""
