# Sourced by docker-entrypoint.sh and nodetool: the flags of Cassandra 5.0's conf/jvm17-server.options. Java
# 17's module system must open what Cassandra (and nodetool, which loads the same classes) reflects on.
# shellcheck shell=bash
jvm17=(-Djdk.attach.allowAttachSelf=true)
for m in java.base/jdk.internal.misc java.base/sun.nio.ch java.management.rmi/com.sun.jmx.remote.internal.rmi java.rmi/sun.rmi.registry \
         java.rmi/sun.rmi.server java.sql/java.sql java.base/java.lang.ref jdk.unsupported/sun.misc; do
  jvm17+=("--add-exports=$m=ALL-UNNAMED")
done
for m in java.base/java.lang.module java.base/jdk.internal.loader java.base/jdk.internal.ref \
         java.base/jdk.internal.reflect java.base/jdk.internal.math java.base/jdk.internal.module \
         java.base/jdk.internal.util.jar jdk.management/com.sun.management.internal java.base/sun.nio.ch \
         java.base/java.io java.base/java.lang.reflect java.base/java.lang java.base/java.util java.base/java.nio; do
  jvm17+=("--add-opens=$m=ALL-UNNAMED")
done
