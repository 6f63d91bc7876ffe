"""A Python service on Tandem, end to end.

It places orders through the example order service, and acts as an app
with its own sidecar: it serves the app callbacks (HandleMessage,
HandleMessages for a batched subscription, for a transactional publish
ExecuteLocalTransaction, and as a saga participant ExecuteBranch and
CompensateBranch with the branch barrier in its SQLite database),
subscribes through its sidecar, publishes through it, both plainly and
transactionally, and starts sagas through it.

Usage: test_client.py --coordinator HOST:PORT --order-service HOST:PORT --db PATH

PATH is the app's SQLite database, which its sidecar shares.

It serves its app callbacks on a free port and prints
`app listening on HOST:PORT`; the address of the sidecar started for it
(with `--app` set to that address) is then read from standard input.
Exits 0 when every check holds.
"""

import argparse
import os
import sqlite3
import sys
import threading
import time
from concurrent import futures

import grpc

import tandem_client
from tandem_client import channel, stubs

pb = stubs()
TOPIC = "py-events"
BATCH_TOPIC = "py-batched"
GROUP = "py-app"
# The longest this app's local transactions may run.
MAX_LOCAL_TRANSACTION_MS = 30_000


class App(pb.app_grpc.AppServicer):
    """The app callbacks the sidecar calls."""

    def __init__(self, db_path):
        self.db_path = db_path
        # Compensations the app ran (null ones never reach it).
        self.compensations = []
        self.lock = threading.Lock()
        self.handled = []
        self.committed = set()
        self.raised = []
        self.arrived = threading.Condition(self.lock)
        # HandleMessages: each call's size, what took effect, refusals.
        self.batches = []
        self.batch_handled = []
        self.refused = []

    def ExecuteLocalTransaction(self, request, context):
        # A real app would change its database here, in one transaction,
        # and record the transaction id in it.
        with self.lock:
            self.committed.add(request.txn_id)
        return pb.app.LocalTransactionResponse(state=pb.coordinator.LOCAL_STATE_COMMIT)

    def CheckLocalTransaction(self, request, context):
        # The rule: COMMIT if the local transaction committed; ROLLBACK only
        # once it can no longer commit (here: older than the longest a local
        # transaction may run); UNKNOWN while it may still be running.
        with self.lock:
            committed = request.txn_id in self.committed
        if committed:
            state = pb.coordinator.LOCAL_STATE_COMMIT
        elif time.time() * 1000 - request.prepared_at_ms > MAX_LOCAL_TRANSACTION_MS:
            state = pb.coordinator.LOCAL_STATE_ROLLBACK
        else:
            state = pb.coordinator.LOCAL_STATE_UNKNOWN
        return pb.app.LocalTransactionResponse(state=state)

    def HandleMessage(self, request, context):
        value = request.message.value.decode()
        with self.lock:
            if value.startswith("raise"):
                # An uncaught exception: grpcio answers UNKNOWN. The sidecar
                # counts it as a failed attempt and dead-letters the message
                # after max_attempts, instead of retrying it forever.
                self.raised.append(request.attempt)
                raise RuntimeError(f"cannot handle {value}")
            self.handled.append(value)
            self.arrived.notify_all()
        return pb.app.HandleMessageResponse()

    def HandleMessages(self, request, context):
        # A batch, for subscriptions with max_batch > 1. A real app applies
        # the messages in one database transaction; here a message whose
        # value starts with "refuse" fails alone and the others succeed:
        # one result per message, in order (an empty list: all handled).
        results = []
        with self.lock:
            self.batches.append(len(request.messages))
            for m in request.messages:
                value = m.message.value.decode()
                if value.startswith("refuse"):
                    self.refused.append(m.attempt)
                    results.append(pb.app.MessageResult(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="refused"))
                else:
                    self.batch_handled.append(value)
                    results.append(pb.app.MessageResult(code=0))
            self.arrived.notify_all()
        return pb.app.HandleMessagesResponse(results=results)

    def _db(self):
        db = sqlite3.connect(self.db_path, timeout=10, isolation_level=None)
        db.execute("CREATE TABLE IF NOT EXISTS reservations (saga_id TEXT, branch TEXT, qty INTEGER)")
        return db

    def ExecuteBranch(self, request, context):
        # A saga branch's action: the barrier row and the effect commit
        # together; a conflict on the barrier row means it ran before (or
        # was compensated first): do nothing and answer OK.
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            inserted = db.execute(
                "INSERT INTO tandem_barrier (saga_id, branch, op, origin) VALUES (?, ?, 'action', 'action') "
                "ON CONFLICT DO NOTHING",
                (request.saga_id, request.branch),
            ).rowcount
            if inserted == 0:
                db.execute("ROLLBACK")
                return pb.app.BranchResponse()
            if request.payload == b"decline":
                # A business failure: nothing done (the barrier row goes too).
                db.execute("ROLLBACK")
                return pb.app.BranchResponse(failed=True, reason="card declined")
            db.execute(
                "INSERT INTO reservations (saga_id, branch, qty) VALUES (?, ?, ?)",
                (request.saga_id, request.branch, int(request.payload or b"1")),
            )
            db.execute("COMMIT")
            return pb.app.BranchResponse()
        finally:
            db.close()

    def CompensateBranch(self, request, context):
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            inserted = db.execute(
                "INSERT INTO tandem_barrier (saga_id, branch, op, origin) "
                "VALUES (?, ?, 'compensation', 'compensation') ON CONFLICT DO NOTHING",
                (request.saga_id, request.branch),
            ).rowcount
            if inserted == 0:
                db.execute("ROLLBACK")
                return pb.app.BranchResponse()
            db.execute("DELETE FROM reservations WHERE saga_id = ? AND branch = ?", (request.saga_id, request.branch))
            db.execute("COMMIT")
            with self.lock:
                self.compensations.append((request.saga_id, request.branch))
            return pb.app.BranchResponse()
        finally:
            db.close()

    def reservations(self, saga_id):
        db = self._db()
        try:
            rows = db.execute("SELECT branch, qty FROM reservations WHERE saga_id = ? ORDER BY branch", (saga_id,))
            return rows.fetchall()
        finally:
            db.close()

    def wait_for_batched(self, n, seconds):
        deadline = time.monotonic() + seconds
        with self.lock:
            while len(self.batch_handled) < n and time.monotonic() < deadline:
                self.arrived.wait(deadline - time.monotonic())
            return list(self.batch_handled)

    def wait_for(self, n, seconds):
        deadline = time.monotonic() + seconds
        with self.lock:
            while len(self.handled) < n and time.monotonic() < deadline:
                self.arrived.wait(deadline - time.monotonic())
            return list(self.handled)


def check(condition, what):
    if not condition:
        raise AssertionError(what)
    print("ok:", what)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--order-service", required=True)
    parser.add_argument("--db", required=True)
    args = parser.parse_args()

    coordinator = pb.coordinator_grpc.CoordinatorStub(grpc.insecure_channel(args.coordinator))
    for name in ("orders", TOPIC, BATCH_TOPIC):
        try:
            coordinator.CreateTopic(pb.coordinator.CreateTopicRequest(name=name, partitions=2), timeout=10)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    # 1. Orders through the example order service (Rust), from Python.
    orders = pb.shop_grpc.OrdersStub(grpc.insecure_channel(args.order_service))
    placed = orders.PlaceOrder(
        pb.shop.PlaceOrderRequest(user="py-user", items=[pb.shop.Item(sku="apple", quantity=2)]), timeout=10
    )
    check(placed.status == "committed", f"order {placed.order_id} committed")
    txn = coordinator.GetTransaction(pb.coordinator.GetTransactionRequest(txn_id=placed.order_id), timeout=10)
    check(txn.state == pb.coordinator.TRANSACTION_STATE_COMMITTED, "its OrderPlaced message is committed")
    try:
        orders.PlaceOrder(pb.shop.PlaceOrderRequest(user="", items=[]), timeout=10)
        check(False, "an empty order is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "user" in e.details(), "an empty order is refused")

    # 2. This process as an app behind its own sidecar.
    app = App(args.db)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb.app_grpc.add_AppServicer_to_server(app, server)
    # The app hop on Unix sockets both ways: the sidecar calls this app on
    # one, the app calls its sidecar on another.
    socket = os.path.join(os.path.dirname(os.path.abspath(args.db)), "py-app.sock")
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    print(f"app listening on unix:{socket}", flush=True)
    sidecar_address = sys.stdin.readline().strip()
    sidecar = pb.sidecar_grpc.SidecarStub(channel(sidecar_address))
    sidecar.Subscribe(
        pb.sidecar.SubscribeRequest(
            topic=TOPIC,
            group=GROUP,
            start_from=pb.coordinator.START_FROM_EARLIEST,
            dedup=pb.sidecar.DEDUP_MODE_SIDECAR,
            max_attempts=3,
            retry_backoff_ms=50,
        ),
        timeout=10,
    )
    subs = sidecar.ListSubscriptions(pb.sidecar.ListSubscriptionsRequest(), timeout=10).subscriptions
    check([(s.topic, s.group) for s in subs] == [(TOPIC, GROUP)], "subscribed through the sidecar")

    values = [f"hello-{i}" for i in range(5)]
    reply = sidecar.Publish(
        pb.coordinator.PublishRequest(
            topic=TOPIC, messages=[pb.coordinator.Message(key=b"same-key", value=v.encode()) for v in values]
        ),
        timeout=10,
    )
    check(len(reply.positions) == 5, "five messages published through the sidecar")
    tx = sidecar.PublishTransactional(
        pb.sidecar.PublishTransactionalRequest(
            topic=TOPIC, message=pb.coordinator.Message(key=b"same-key", value=b"transactional")
        ),
        timeout=10,
    )
    check(tx.state == pb.coordinator.TRANSACTION_STATE_COMMITTED, "a transactional publish committed (callback mode)")

    handled = app.wait_for(6, 30)
    check(handled == values + ["transactional"], "HandleMessage got all six, in key order, once each")
    # the sidecar counts a message once the handler's answer is back
    deadline = time.monotonic() + 10
    while sidecar.GetStats(pb.sidecar.GetStatsRequest(), timeout=10).handled < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = sidecar.GetStats(pb.sidecar.GetStatsRequest(), timeout=10)
    check(stats.handled == 6 and stats.duplicates_skipped == 0, "the sidecar counted six handled messages")
    # 3. A handler that raises: three counted attempts, then the dead-letter
    # topic, and the key moves on.
    sidecar.Publish(
        pb.coordinator.PublishRequest(
            topic=TOPIC,
            messages=[
                pb.coordinator.Message(key=b"poison-key", value=b"raise-1"),
                pb.coordinator.Message(key=b"poison-key", value=b"after-raise"),
            ],
        ),
        timeout=10,
    )
    handled = app.wait_for(7, 30)
    check(handled[-1] == "after-raise", "the key's next message is handled after the raising one")
    with app.lock:
        raised = list(app.raised)
    check(raised == [1, 2, 3], f"the raising handler was called with attempts 1, 2, 3 (got {raised})")
    dlq = coordinator.DescribeTopic(pb.coordinator.DescribeTopicRequest(name=TOPIC + ".dlq"), timeout=10)
    check(sum(p.high_water_mark for p in dlq.partitions) == 1, "the raising message is in the dead-letter topic")
    # 4. Batches: HandleMessages with several messages per call, each
    # message with its own result.
    sidecar.Subscribe(
        pb.sidecar.SubscribeRequest(
            topic=BATCH_TOPIC,
            group=GROUP,
            start_from=pb.coordinator.START_FROM_EARLIEST,
            max_in_flight=16,
            max_batch=16,
            max_attempts=3,
            retry_backoff_ms=50,
        ),
        timeout=10,
    )
    batch_values = [f"b{i:02}" for i in range(40)]
    messages = [pb.coordinator.Message(key=f"k{i % 10}".encode(), value=v.encode()) for i, v in enumerate(batch_values)]
    messages.insert(0, pb.coordinator.Message(key=b"k0", value=b"refuse-me"))
    sidecar.Publish(pb.coordinator.PublishRequest(topic=BATCH_TOPIC, messages=messages), timeout=10)
    handled = app.wait_for_batched(40, 30)
    check(sorted(handled) == batch_values, "HandleMessages got the other 40 once each")
    per_key = [[v for v in handled if int(v[1:]) % 10 == k] for k in range(10)]
    check(all(vs == sorted(vs) for vs in per_key), "each key's messages in order")
    with app.lock:
        batches, refused = list(app.batches), list(app.refused)
    check(max(batches) > 1, f"calls carried several messages (sizes {sorted(set(batches))})")
    check(refused == [1, 2, 3], f"the refused message had its own attempts 1, 2, 3 (got {refused})")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        dlq = coordinator.DescribeTopic(pb.coordinator.DescribeTopicRequest(name=BATCH_TOPIC + ".dlq"), timeout=10)
        if sum(p.high_water_mark for p in dlq.partitions) == 1:
            break
        time.sleep(0.05)
    check(sum(p.high_water_mark for p in dlq.partitions) == 1, "the refused message alone is dead-lettered")
    # 5. Sagas: this app is the participant of both branches; one saga
    # succeeds, one is declined and compensated, one starts with a local
    # transaction.
    def saga(saga_id, charge):
        return pb.coordinator.StartSagaRequest(
            saga_id=saga_id,
            definition=pb.coordinator.SagaDefinition(
                branches=[
                    pb.coordinator.SagaBranch(
                        name="reserve", service="py-app", action="reserve", compensation="release", payload=b"3"
                    ),
                    pb.coordinator.SagaBranch(
                        name="charge", service="py-app", action="charge", compensation="refund", payload=charge
                    ),
                ]
            ),
        )

    def finished(saga_id):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                s = sidecar.GetSaga(pb.coordinator.GetSagaRequest(saga_id=saga_id), timeout=10)
                if s.status in (pb.coordinator.SAGA_STATUS_SUCCEEDED, pb.coordinator.SAGA_STATUS_COMPENSATED):
                    return s
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            time.sleep(0.05)
        raise AssertionError(f"saga {saga_id} did not finish")

    started = sidecar.StartSaga(saga("py-ok", b"1"), timeout=10)
    check(started.service == "py-app", "a saga started through the sidecar is its service's")
    s = finished("py-ok")
    check(s.status == pb.coordinator.SAGA_STATUS_SUCCEEDED, "the saga succeeded")
    check(app.reservations("py-ok") == [("charge", 1), ("reserve", 3)], "both actions took effect once")
    sidecar.StartSaga(saga("py-declined", b"decline"), timeout=10)
    s = finished("py-declined")
    check(s.status == pb.coordinator.SAGA_STATUS_COMPENSATED, "the declined saga was compensated")
    check(s.reason == "branch charge failed: card declined", f"and says why ({s.reason})")
    check(app.reservations("py-declined") == [], "its reservation was released")
    with app.lock:
        compensations = [c for c in app.compensations if c[0] == "py-declined"]
    check(compensations == [("py-declined", "reserve")], "the declined charge was a null compensation, never called")
    txn = sidecar.BeginSaga(pb.sidecar.BeginSagaRequest(saga=saga("py-atomic", b"2")), timeout=10).txn_id
    db = app._db()
    db.execute("CREATE TABLE IF NOT EXISTS py_orders (id TEXT PRIMARY KEY)")
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO py_orders (id) VALUES ('py-atomic')")
    db.execute("INSERT INTO tandem_txn (txn_id) VALUES (?)", (txn,))
    db.execute("COMMIT")
    db.close()
    sidecar.Commit(pb.sidecar.EndRequest(txn_id=txn), timeout=10)
    s = finished("py-atomic")
    check(s.status == pb.coordinator.SAGA_STATUS_SUCCEEDED, "a saga begun with a local transaction ran once it committed")
    try:
        sidecar.Commit(pb.sidecar.EndRequest(txn_id="no-such-transaction"), timeout=10)
        check(False, "an unknown transaction is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND, "an unknown transaction is NOT_FOUND")
    server.stop(grace=1)
    # The test checks this folder is gone once the process has exited.
    print(f"stubs generated in {tandem_client._generated}", flush=True)
    print("all checks passed")


if __name__ == "__main__":
    main()
