# A heartbeat.v1 client on stubs from grpcio-tools: say Hello, answer every Ping.
import queue, sys
import grpc
from heartbeat.v1 import heartbeat_pb2 as pb, heartbeat_pb2_grpc as rpc

outbox = queue.Queue()
outbox.put(pb.HeartbeatRequest(hello=pb.Hello(client_id=sys.argv[2])))
stub = rpc.HeartbeatServiceStub(grpc.insecure_channel(sys.argv[1]))
try:
    for frame in stub.Heartbeat(iter(outbox.get, None)):
        if frame.HasField("welcome"):
            print("session", frame.welcome.session_id, flush=True)
        elif frame.HasField("ping"):  # answering every Ping is all it takes to stay alive
            outbox.put(pb.HeartbeatRequest(pong=pb.Pong(seq=frame.ping.seq)))
        elif frame.HasField("goodbye"):
            print("goodbye", pb.GoodbyeReason.Name(frame.goodbye.reason), flush=True)
except grpc.RpcError as end:
    print("ended", end.code().name, flush=True)
