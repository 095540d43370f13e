"""Prometheus metrics, one registry per worker (no module-level collectors).

Names follow Prometheus conventions: `relay_` prefix, `_total` on counters, seconds.
The periodic summary log line reads the same counters, so logs and metrics never disagree.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from relay import __version__

CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
AGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0)
# Every value the labels take (the dead-letter classes, observe_call's outcomes, the
# shedding policies), exported at 0 from the start.
ERROR_CLASSES = ("invalid", "rejected", "exhausted")
CALL_OUTCOMES = ("2xx", "4xx", "5xx", "network")
SHED_POLICIES = ("backlog", "max_age")


class Metrics:
    """The series about an app's deliveries carry an `app` label (RELAY_APPS; `default` when
    there is one app): delivered, dead-lettered, retried, Pusher calls and their latency, the
    circuit, rate-limit waits. The others are the process's or the queue's."""

    def __init__(self, apps: tuple[str, ...] = ("default",)) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.delivered = Counter("relay_notifications_delivered", "Notifications Pusher accepted",
                                 ["app"], registry=r)
        self.dead = Counter("relay_notifications_dead_lettered",
                            "Notifications moved to the dead-letter list", ["reason", "app"],
                            registry=r)
        self.retried = Counter("relay_notifications_retried",
                               "Notifications scheduled for another attempt", ["app"],
                               registry=r)
        self.requeued = Counter("relay_notifications_requeued",
                                "Notifications put back untouched (circuit open, 429, stop)",
                                registry=r)
        self.shed = Counter("relay_notifications_shed", "Notifications dropped by a policy",
                            ["policy"], registry=r)
        self.recovered = Counter("relay_notifications_recovered",
                                 "In-flight notifications of dead workers returned to the queue",
                                 registry=r)
        self.calls = Counter("relay_pusher_calls", "Pusher HTTP calls by outcome",
                             ["status", "app"], registry=r)
        self.call_seconds = Histogram("relay_pusher_call_duration_seconds",
                                      "Pusher HTTP call latency", ["app"], buckets=CALL_BUCKETS,
                                      registry=r)
        self.age_seconds = Histogram("relay_delivery_age_seconds",
                                     "Enqueue-to-delivery age (envelopes with enqueued_at)",
                                     buckets=AGE_BUCKETS, registry=r)
        self.redis_errors = Counter("relay_redis_errors", "Failed Redis calls", registry=r)
        self.rate_waits = Counter("relay_rate_limit_waits",
                                  "Times a greenlet waited for the shared rate limit", ["app"],
                                  registry=r)
        self.blocked = Counter("relay_event_loop_blocked",
                               "Times a greenlet blocked the gevent hub too long", registry=r)
        self.inflight = Gauge("relay_inflight", "Notifications being handled now", registry=r)
        self.pool_size = Gauge("relay_pool_size", "Greenlets in the pool", registry=r)
        self.queue_length = Gauge("relay_queue_length", "Length of the queue list", registry=r)
        self.parked = Gauge("relay_parked",
                            "Notifications taken from the queue that wait in the lane lists of "
                            "this process's channels (a busy channel's overflow)", registry=r)
        self.dead_length = Gauge("relay_dead_letters", "Length of the dead-letter list",
                                 registry=r)
        self.retry_length = Gauge("relay_retry_scheduled", "Notifications waiting for a retry",
                                  registry=r)
        self.circuit_open = Gauge("relay_circuit_open", "1 while the circuit to Pusher is open",
                                  ["app"], registry=r)
        # The operator's brakes (relay.pause), as this process last learned them.
        self.paused = Gauge("relay_paused", "1 while delivery is paused (relay pause)",
                            registry=r)
        self.paused_since = Gauge("relay_paused_since_seconds",
                                  "When the pause began (Unix time, Redis clock); 0 when not "
                                  "paused", registry=r)
        self.quiet = Gauge("relay_quiet", "1 once this process is quiet (SIGTSTP, relay quiet)",
                           registry=r)
        Info("relay_build", "relay version", registry=r).info({"version": __version__})
        for policy in SHED_POLICIES:
            self.shed.labels(policy)
        self.start_at_zero(apps)

    def start_at_zero(self, apps: tuple[str, ...]) -> None:
        """Export every label value of these apps at 0. A series that first appears at 1 has
        no increase to Prometheus, so the first dead letter of a process would never fire
        RelayDeadLettersGrowing (deploy/prometheus/relay-alerts.yml). Called again for the
        apps a reload adds."""
        for app in apps:
            self.delivered.labels(app)
            self.retried.labels(app)
            self.rate_waits.labels(app)
            self.circuit_open.labels(app)
            for reason in ERROR_CLASSES:
                self.dead.labels(reason, app)
            for status in CALL_OUTCOMES:
                self.calls.labels(status, app)

    def observe_call(self, app: str, status: int | None, seconds: float) -> None:
        """Delivery's on_call hook: one count by the outcome relay acted on (the status class
        of the code it read, so an error inside a 200 is a 4xx; "network" when no answer came)
        and one latency sample."""
        self.calls.labels("network" if status is None else f"{status // 100}xx", app).inc()
        self.call_seconds.labels(app).observe(seconds)

    @staticmethod
    def total(counter: Counter, **labels: str) -> float:
        """Sum over every label set matching `labels`: the summary line wants one number."""
        return sum(s.value for m in counter.collect() for s in m.samples
                   if s.name.endswith("_total")
                   and all(s.labels.get(k) == v for k, v in labels.items()))
