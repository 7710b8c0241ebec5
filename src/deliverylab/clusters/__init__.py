"""Clusters: the servers the book and the tests start, watch, kill and stop on this machine.
``nats_cluster`` runs three ``nats-server`` processes as one JetStream cluster;
``rabbitmq_cluster`` runs three RabbitMQ nodes as one cluster. They start servers; the clients
that talk to those servers are the brokers (``deliverylab.brokers``)."""
