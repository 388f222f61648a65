#!/bin/bash
# Writes cassandra.yaml from the same CASSANDRA_* variables the official image reads, then runs one node in
# the foreground. Variables: CASSANDRA_CLUSTER_NAME, CASSANDRA_SEEDS, CASSANDRA_ENDPOINT_SNITCH, CASSANDRA_DC,
# CASSANDRA_RACK, CASSANDRA_NUM_TOKENS, CASSANDRA_LISTEN_ADDRESS, CASSANDRA_BROADCAST_ADDRESS,
# CASSANDRA_BROADCAST_RPC_ADDRESS, MAX_HEAP_SIZE, HEAP_NEWSIZE (accepted; G1 sizes the young generation
# itself, as Cassandra 5.0's own scripts do under G1) and JVM_EXTRA_OPTS.
set -euo pipefail

if [ "${1:-}" != cassandra ]; then exec "$@"; fi

# The first address of this container, as the official entrypoint picks it.
own_ip=$(hostname -i | awk '{print $1}')
listen=${CASSANDRA_LISTEN_ADDRESS:-auto}
[ "$listen" = auto ] && listen=$own_ip
broadcast=${CASSANDRA_BROADCAST_ADDRESS:-$listen}
rpc_broadcast=${CASSANDRA_BROADCAST_RPC_ADDRESS:-$broadcast}
seeds=${CASSANDRA_SEEDS:-$broadcast}
conf=/etc/cassandra

cat >"$conf/cassandra.yaml" <<YAML
cluster_name: '${CASSANDRA_CLUSTER_NAME:-Test Cluster}'
num_tokens: ${CASSANDRA_NUM_TOKENS:-16}
allocate_tokens_for_local_replication_factor: 3
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: ${CASSANDRA_ENDPOINT_SNITCH:-SimpleSnitch}
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "${seeds}"
listen_address: ${listen}
broadcast_address: ${broadcast}
rpc_address: 0.0.0.0
broadcast_rpc_address: ${rpc_broadcast}
storage_port: 7000
native_transport_port: 9042
start_native_transport: true
commitlog_sync: periodic
commitlog_sync_period: 10000ms
# Cassandra's own defaults, spelled out: a replica that was down gets the writes it missed as hints.
hinted_handoff_enabled: true
max_hint_window: 3h
concurrent_compactors: 1
YAML
printf 'dc=%s\nrack=%s\nprefer_local=true\n' "${CASSANDRA_DC:-datacenter1}" "${CASSANDRA_RACK:-rack1}" \
  >"$conf/cassandra-rackdc.properties"

heap=${MAX_HEAP_SIZE:-1G}
# Java 17 module flags (jvm17.sh, shared with nodetool).
. /opt/cassandra/conf/jvm17.sh
# shellcheck disable=SC2086  # JVM_EXTRA_OPTS is a list of options, split on spaces as the official image does.
exec java "-Xms$heap" "-Xmx$heap" -Xss256k -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError -XX:+CrashOnOutOfMemoryError \
  -Djava.net.preferIPv4Stack=true "${jvm17[@]}" \
  -Dio.netty.tryReflectionSetAccessible=true -Dio.netty.allocator.useCacheForAllThreads=true \
  -Dio.netty.allocator.maxOrder=11 \
  -Dcassandra-foreground=yes \
  "-Dcassandra.config=file://$conf/cassandra.yaml" \
  -Dcassandra.storagedir=/var/lib/cassandra -Dcassandra.logdir=/var/lib/cassandra/logs \
  -Dlogback.configurationFile=/opt/cassandra/conf/logback.xml \
  -Dcassandra.jmx.local.port=7199 -Djava.io.tmpdir=/var/lib/cassandra/tmp \
  ${JVM_EXTRA_OPTS:-} \
  -cp "$conf:/opt/cassandra/lib/*" org.apache.cassandra.service.CassandraDaemon
