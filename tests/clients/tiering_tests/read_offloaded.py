"""Reads an offloaded ledger with pyarrow, as an analytics tool would.

    python read_offloaded.py --endpoint http://127.0.0.1:9000 \\
        --bucket magnetar --key offload/persistent/public/default/t/12-….arrow
    python read_offloaded.py FILE.arrow

prints the rows, the offset range and the first rows' keys. Each file is a
plain Arrow IPC file with the columns offset, timestamp, key, value,
headers, producer_id and control (transaction markers, which are not
data)."""

import argparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.ipc


def open_table(key, endpoint=None, bucket=None, access_key="test", secret_key="test",
               region="us-east-1"):
    """The file's data rows (markers left out) as a pyarrow Table."""
    if endpoint:
        scheme, host = endpoint.split("://", 1)
        fs = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme, region=region,
                                     access_key=access_key, secret_key=secret_key)
        source = fs.open_input_file(f"{bucket}/{key}")
    else:
        source = pa.memory_map(key)
    table = pyarrow.ipc.open_file(source).read_all()
    return table.filter(pc.invert(table["control"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("key", help="the object's key, or a local file")
    ap.add_argument("--endpoint")
    ap.add_argument("--bucket")
    args = ap.parse_args()
    t = open_table(args.key, args.endpoint, args.bucket)
    print(f"rows={t.num_rows} columns={t.column_names}")
    if t.num_rows:
        print(f"offsets={pc.min(t['offset'])}..{pc.max(t['offset'])}")
        for k in t["key"][:5].to_pylist():
            print(f"key={k!r}")


if __name__ == "__main__":
    main()
