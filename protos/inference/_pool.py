"""A private protobuf descriptor pool for the KServe v2 (``inference``) messages.

tritonclient ships its own generated ``inference.*`` messages in the default pool; two different
files defining the same symbols in one pool is an error, so a process could not import both this
server's stubs and tritonclient. protos/generate.sh rewrites the generated ``*_pb2.py`` of this
package to register here instead. Wire format and RPC paths are unaffected.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
