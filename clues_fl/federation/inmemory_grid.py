"""An in-memory Flower Grid: delivers messages straight to the real ClientApp in this
process and keeps every message it carried. The evaluation suite uses it to run many
selection methods over one shared trace without a SuperLink; tests use it to inspect
exactly what left each site."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid


@dataclass
class Exchange:
    node: int
    message_type: str
    sent: Message
    reply: Message


@dataclass
class InMemoryGrid(Grid):
    client_app: object
    node_configs: dict[int, dict]
    run_config: dict
    fail: dict[tuple[int, str], Exception] = field(default_factory=dict)  # (node, phase) -> error
    log: list[Exchange] = field(default_factory=list)

    def __post_init__(self):
        from flwr.supercore.task_identity import TaskIdentity

        # Messages read the task identity that a real SuperLink process would set.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self._contexts = {
            node: Context(run_id=1, node_id=node, node_config=cfg, state=RecordDict(), run_config=self.run_config)
            for node, cfg in self.node_configs.items()
        }
        self._ids = itertools.count(1)

    # the abstract API ---------------------------------------------------------
    def set_run(self, run):  # pragma: no cover - not used in tests
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self):
        return list(self._contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            node = message.metadata.dst_node_id
            phase = message.metadata.message_type
            if (node, phase) in self.fail:
                from flwr.app import Error

                reply = Message(Error(code=0, reason=str(self.fail[(node, phase)])), reply_to=message)
            else:
                reply = self.client_app(message, self._contexts[node])
            self.log.append(Exchange(node, phase, message, reply))
            replies.append(reply)
        return replies
