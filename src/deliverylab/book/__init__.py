"""What only the book uses: the seeded lab scenario, its views and panel, the trace's
pictures, and each chapter's experiments (some wrong on purpose).

Which module serves which chapter (the chapters import nothing else from here):

=========================================  ==============================================
chapter                                    modules
=========================================  ==============================================
1  The three guarantee families            ``lab``, ``labviews``
2  The lost ACK                            ``lab``, ``traceviews``
3  The four-part toolkit                   ``lab``, ``toolkit``, ``backoff``, ``traceviews``
3.1  Spot the bug                          ``lab``, ``toolkit``, ``naive``, ``traceviews``
3.2  The same queue on PostgreSQL          ``pgdemo``
4  The hands-on lab                        ``lab``, ``panel``, ``producer``, ``traceviews``
5  Reconciliation                          ``lab``, ``labviews``, ``naive``, ``traceviews``
6  What an inbox does not cover            ``lab``, ``toolkit``, ``effects``, ``ordering``,
                                           ``payment_outbox``, ``retention_runs``
7  Beyond one machine                      ``beyond``, ``cluster_run``
8  Running it for real                     ``lab``, ``zombies``, ``retries``, ``batches``,
                                           ``sagas``, ``alerts``, ``mqtt``
=========================================  ==============================================

Beside them: ``tables`` (the tables a module adds beside the engine's schema) and
``estimates`` (each chapter's reading time, derived from the chapter for the introduction).
``naive`` is the seed chapter's design, kept wrong on purpose for teaching.
``payment_outbox`` is chapter 6's *outbound* outbox (a payment request sent after the
commit) and the pass that sends it; the engine's relay, which publishes the transactional
outbox to a broker, is ``deliverylab.engine.relay``.
"""
