fn main() {
    let mut body = String::from("[");
    for i in 0..30000 {
        if i > 0 {
            body.push(',');
        }
        let svc = format!("svc-{:05}", i / 3);
        body.push_str(&format!(r#"{{"Node":"bench-node-{}","CheckID":"check-{svc}-{}","Name":"Service '{svc}' check","Status":"passing","Notes":"","Output":"","ServiceID":"{svc}-{}","ServiceName":"{svc}","ServiceTags":["traefik.enable=true","traefik.tcp.routers.{svc}.rule=ClientIP(`127.1.2.3`)","traefik.tcp.routers.{svc}.entryPoints=tcp","traefik.tcp.services.{svc}.loadBalancer.server.port=1234"],"Type":"","Interval":"","Timeout":"","ExposedPort":0,"Definition":{{}},"CreateIndex":12,"ModifyIndex":12}}"#, i%3, i%3, i%3));
    }
    body.push(']');
    println!("{} bytes", body.len());
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let mut c = tagway_provider_consul::census::Census::new();
        for piece in body.as_bytes().chunks(16384) {
            c.feed(piece).unwrap();
        }
        let d = c.finish().unwrap();
        println!("{} services in {:?}", d.len(), t.elapsed());
    }
}
