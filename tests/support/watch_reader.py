"""A presence watch read from Python's grpc.aio, for the stall test.

Prints one line per event, "<revision> <kind>", and resumes from the last
revision it reached after `synced` whenever the stream breaks. Stubs are
generated from proto/ by the test before this runs; pass their directory.
"""

import argparse
import asyncio
import sys


async def watch(target: str) -> None:
    import grpc
    from heartbeat.v1 import presence_pb2, presence_pb2_grpc

    epoch, revision = 0, 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = presence_pb2_grpc.PresenceServiceStub(channel)
        while True:
            synced = False
            request = presence_pb2.WatchSessionsRequest(
                resume_epoch=epoch, resume_after=revision
            )
            try:
                async for event in stub.WatchSessions(request):
                    kind = event.WhichOneof("event")
                    if kind == "synced":
                        synced = True
                        epoch = event.synced.epoch
                    if synced:
                        revision = event.revision
                    print(event.revision, kind, flush=True)
            except grpc.aio.AioRpcError as error:
                print("interrupted", error.code().name, flush=True)
                await asyncio.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--stubs", required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.stubs)
    asyncio.run(watch(args.target))


if __name__ == "__main__":
    main()
