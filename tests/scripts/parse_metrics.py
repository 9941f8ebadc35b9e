#!/usr/bin/env python3
"""Parse OpenMetrics text (stdin) with the prometheus_client package's parser, an independent
reader of what our /metrics endpoints serve; print the samples as JSON:
[{"family", "type", "name", "labels", "value"}]. A text the parser refuses exits non-zero."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"family": family.name, "type": family.type, "name": s.name, "labels": s.labels,
                    "value": s.value})
print(json.dumps(out))
