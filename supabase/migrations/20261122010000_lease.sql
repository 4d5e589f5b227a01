-- The session lease of connection/lease.py (SupabaseRestLease): one running bot per WhatsApp session when
-- the bot reaches Supabase only through its REST API (SUPABASE_URL/SUPABASE_KEY, no SUPABASE_DB_URL).
--
-- A lease is a row with an expiry. The holder renews it every ttl/3; another instance takes it over only
-- once it has expired, so a holder that dies without releasing is replaced after ttl seconds. Every time
-- is the database's own clock (now()), never a client's.
--
-- Idempotent like the init migration: applying it again changes nothing.

create table if not exists public.bot_leases (
    name text primary key check (length(name) between 1 and 200),
    holder text not null check (length(holder) between 1 and 200),
    acquired_at timestamptz not null default now(),
    renewed_at timestamptz not null default now(),
    expires_at timestamptz not null
);

-- Take the lease, or renew it when p_holder already holds it. Returns one row: who holds it now, whether
-- that is p_holder, and the seconds left before it expires.
-- The upsert is atomic: of two instances asking at once, one inserts and the other's conflict update finds
-- an unexpired row held by someone else and changes nothing.
create or replace function public.bot_lease_acquire(p_name text, p_holder text, p_ttl_seconds double precision)
returns table (holder text, acquired boolean, expires_in_s double precision)
language plpgsql
volatile
set search_path = ''
as $$
begin
    if p_ttl_seconds is null or p_ttl_seconds < 1 or p_ttl_seconds > 3600 then
        raise exception 'p_ttl_seconds must be between 1 and 3600' using errcode = '22023';
    end if;
    insert into public.bot_leases as l (name, holder, acquired_at, renewed_at, expires_at)
    values (p_name, p_holder, now(), now(), now() + make_interval(secs => p_ttl_seconds))
    on conflict (name) do update
        set holder = excluded.holder,
            acquired_at = case when l.holder = excluded.holder then l.acquired_at else now() end,
            renewed_at = now(),
            expires_at = excluded.expires_at
        where l.holder = excluded.holder or l.expires_at <= now();
    return query
        select l.holder, l.holder = p_holder, greatest(0, extract(epoch from l.expires_at - now()))::double precision
        from public.bot_leases l
        where l.name = p_name;
end;
$$;

-- Give the lease back; true when p_holder held it.
create or replace function public.bot_lease_release(p_name text, p_holder text)
returns boolean
language plpgsql
volatile
set search_path = ''
as $$
begin
    delete from public.bot_leases l where l.name = p_name and l.holder = p_holder;
    return found;
end;
$$;

-- Same rules as the other tables: RLS on, only service_role (which the bot uses) may touch it.
alter table public.bot_leases enable row level security;

do $$
begin
    if not exists (
        select 1 from pg_policies
        where schemaname = 'public' and tablename = 'bot_leases' and policyname = 'service_role full access'
    ) then
        create policy "service_role full access" on public.bot_leases
            as permissive for all to service_role using (true) with check (true);
    end if;
end;
$$;

revoke all on table public.bot_leases from anon, authenticated;
revoke all on function public.bot_lease_acquire(text, text, double precision) from public, anon, authenticated;
revoke all on function public.bot_lease_release(text, text) from public, anon, authenticated;
grant select, insert, update, delete on table public.bot_leases to service_role;
grant execute on function public.bot_lease_acquire(text, text, double precision) to service_role;
grant execute on function public.bot_lease_release(text, text) to service_role;
