"""A plain Python consumer loop: the baseline `sluice bench baseline` measures
Sluice's inferrer against (confluent-kafka and torch, as a competent user would
write it).

It reads the same normalised-window records as Sluice's inferrer, from the
same broker, and runs the same TorchScript model on the same batch size:
one `consume` of up to `--batch` records, the windows taken as the last
`days * features * 4` bytes of each record (where Sluice's envelope keeps them)
and read with one `np.frombuffer` per batch, one forward pass, one JSON answer
per record produced with an idempotent producer, and the batch's offsets
stored once every answer of it is delivered, for the consumer's auto-commit
(at-least-once, as Sluice does it).

Prints one JSON line: events, seconds from the first record to the last
delivery, and events per second.
"""

import argparse
import json
import time

import numpy as np
import torch
from confluent_kafka import Consumer, Producer, TopicPartition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--model", required=True, help="model.pt (TorchScript)")
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--features", type=int, default=105)
    args = parser.parse_args()

    torch.set_num_threads(1)
    model = torch.jit.load(args.model).eval()
    window = args.days * args.features * 4
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": args.group,
            # Offsets are stored by hand, after delivery, and committed in the
            # background: what Sluice does too.
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_uncommitted",
        }
    )
    consumer.subscribe([args.topic])
    producer = Producer({"bootstrap.servers": args.brokers, "enable.idempotence": True, "linger.ms": 5})

    failed = []

    def delivered(error, _record):
        if error is not None:
            failed.append(error)

    done, started = 0, None
    while done < args.events:
        records = [r for r in consumer.consume(num_messages=args.batch, timeout=1.0) if r.error() is None]
        if not records:
            continue
        if started is None:
            started = time.perf_counter()
        values = np.frombuffer(b"".join(r.value()[-window:] for r in records), dtype="<f4")
        batch = torch.from_numpy(values.reshape(len(records), args.days, args.features).copy())
        with torch.inference_mode():
            out = model(batch)
        if isinstance(out, (tuple, list)):
            out = out[0]
        for record, (predicted, confidence) in zip(records, out.tolist()):
            answer = {
                "partition": record.partition(),
                "offset": record.offset(),
                "predicted_return": predicted,
                "confidence": confidence,
                "batch_size": len(records),
            }
            producer.produce(args.out, json.dumps(answer).encode(), key=record.key(), on_delivery=delivered)
        producer.flush()
        if failed:
            raise SystemExit(f"an answer was not delivered: {failed[0]}")
        last = {}
        for record in records:
            last[(record.topic(), record.partition())] = record.offset()
        consumer.store_offsets(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()])
        done += len(records)
    seconds = time.perf_counter() - started
    consumer.close()  # commits the stored offsets
    print(json.dumps({"events": done, "seconds": seconds, "events_per_s": done / seconds}))


if __name__ == "__main__":
    main()
