"""A small OTLP/HTTP metrics receiver for the tests (what an OpenTelemetry collector's otlp
receiver does for `POST /v1/metrics` with a protobuf body, and no more).

    python receiver.py PORT OUT_FILE [--hang]

Listens on 127.0.0.1:PORT. Each ExportMetricsServiceRequest is decoded with opentelemetry-proto
(the OpenTelemetry project's own generated classes) and appended to OUT_FILE as one JSON line:

    {"headers": {...}, "resources": [{"attributes": {...}, "scopes": [{"name": ..., "metrics": [
        {"name", "description", "unit", "kind": "sum"|"gauge", "monotonic", "temporality",
         "points": [{"attributes": {...}, "value": ..., "start_ns": ..., "time_ns": ...}]}]}]}]}

A histogram ("kind": "histogram", "temporality") has points with "count", "sum", "min", "max",
"bucket_counts" and "explicit_bounds" instead of "value".

and answered 200 with an empty ExportMetricsServiceResponse. Anything else is 400/404/415.
With --hang it accepts connections and never answers (a collector that is stuck).
"""
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

port, out_path = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()


def value_of(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def attributes(kvs):
    return {kv.key: value_of(kv.value) for kv in kvs}


def point(p):
    kind = p.WhichOneof("value")
    return {"attributes": attributes(p.attributes), "value": getattr(p, kind) if kind else None,
            "start_ns": p.start_time_unix_nano, "time_ns": p.time_unix_nano}


def histogram_point(p):
    return {"attributes": attributes(p.attributes), "count": p.count,
            "sum": p.sum if p.HasField("sum") else None, "min": p.min if p.HasField("min") else None,
            "max": p.max if p.HasField("max") else None, "bucket_counts": list(p.bucket_counts),
            "explicit_bounds": list(p.explicit_bounds), "start_ns": p.start_time_unix_nano, "time_ns": p.time_unix_nano}


def metric(m):
    kind = m.WhichOneof("data")
    out = {"name": m.name, "description": m.description, "unit": m.unit, "kind": kind}
    if kind == "sum":
        out.update(monotonic=m.sum.is_monotonic, temporality=m.sum.aggregation_temporality,
                   points=[point(p) for p in m.sum.data_points])
    elif kind == "gauge":
        out["points"] = [point(p) for p in m.gauge.data_points]
    elif kind == "histogram":
        out.update(temporality=m.histogram.aggregation_temporality,
                   points=[histogram_point(p) for p in m.histogram.data_points])
    else:
        out["points"] = []
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body=b"", content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/metrics":
            return self.answer(404, b"not found\n")
        if self.headers.get("Content-Type") != "application/x-protobuf":
            return self.answer(415, b"protobuf only\n")
        request = metrics_service_pb2.ExportMetricsServiceRequest()
        try:
            request.ParseFromString(body)
        except DecodeError as e:
            return self.answer(400, str(e).encode())
        record = {"received_ns": time.time_ns(), "headers": {k.lower(): v for k, v in self.headers.items()},
                  "resources": [{"attributes": attributes(rm.resource.attributes),
                                 "scopes": [{"name": sm.scope.name, "metrics": [metric(m) for m in sm.metrics]}
                                            for sm in rm.scope_metrics]}
                                for rm in request.resource_metrics]}
        with lock, open(out_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        response = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
        self.answer(200, response, "application/x-protobuf")

    def log_message(self, *args):
        pass


def hang():
    server = socket.create_server(("127.0.0.1", port), reuse_port=False)
    held = []
    while True:
        conn, _ = server.accept()
        held.append(conn)  # never read, never answered, never closed


if "--hang" in sys.argv[3:]:
    hang()
else:
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
